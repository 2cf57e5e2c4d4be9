"""Model identity for harvests and stores: see `tdb_lens.provenance` (shared with SAE training)."""

from ..provenance import ModelIdentity, model_identity, model_name_of, splice_digest, weights_digest

__all__ = ["ModelIdentity", "model_identity", "model_name_of", "splice_digest", "weights_digest"]
