"""What a model trained on besides the images (DRAEM's textures, DSR's VQ-VAE, EfficientAD's teacher)."""

from __future__ import annotations

from typing import Any


class RecordsSources:
    """Mixin for a torch model that keeps a JSON-ready record of its data sources in ``self._sources``.

    The Lightning adapter saves ``data_sources()`` in every checkpoint and gives it back to
    ``restore_sources()`` on load; what the model has built since (a live source) wins over the stored record.
    """

    _sources: dict[str, Any]

    def data_sources(self) -> dict[str, Any]:
        """Provenance of the data the model was trained on besides the images (JSON-ready; {} if unknown)."""
        return dict(getattr(self, "_sources", {}))

    def restore_sources(self, record: dict[str, Any]) -> None:
        """Set the provenance read back from a checkpoint (sources built in this process keep theirs)."""
        self._sources = {**dict(record), **getattr(self, "_sources", {})}
