class VectorQuantizer: ...  # scaffold, replaced by the codebook owner
