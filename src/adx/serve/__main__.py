"""``python -m adx.serve ...`` = ``adx serve ...`` without importing Lightning."""

from adx.serve import main

main()
