"""Constants of the op contracts, defined once for the public functions, the Triton kernels and the
reference (the C++ kernels mirror them in csrc/)."""

GRAM_K_RANGE = (2, 8)  # modalities per GRAM volume, anchor included (k of the k x k Gram matrix)
MAX_K = 32  # largest k of the codebook lookup's running top-k (a sorted list per row in registers / cache)
METRICS = ("l2", "cosine", "dot")  # codebook lookup metrics
# Cosine metric: norms are clamped at NORM_EPS, so a zero vector gets a zero unit vector (cosine
# distance 1 to every code) instead of NaN.
NORM_EPS = 1e-12
