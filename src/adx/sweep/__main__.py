"""``python -m adx.sweep ...`` runs ``adx sweep ...``."""

from adx.sweep.command import main

main()
