"""Element type of each argument name of the Metal kernels (the arrays turboquant.metal
passes to mx.fast.metal_kernel), shared by the kernel compile checks and the emulator."""

ARG_TYPES = {
    "x": "float", "signs": "float", "boundaries": "float", "params": "uint32_t",
    "codes": "uint8_t", "norms": "uint16_t", "y": "float", "centroids": "float", "out": "float",
    "q": "float", "k_codes": "uint8_t", "k_norms": "uint16_t", "v_codes": "uint8_t",
    "v_norms": "uint16_t", "k_centroids": "float", "v_centroids": "float", "part_m": "float",
    "part_l": "float", "part_acc": "float", "v_signs": "float", "angles": "float",
    "angle_bounds": "float", "k_signs": "float", "k_a": "uint16_t", "v_a": "uint16_t",
    "k_b": "uint16_t", "v_b": "uint16_t", "src": "uint16_t", "dst": "uint16_t",
    "order": "uint32_t", "before": "uint16_t", "after": "uint16_t",
    "k_rows": "uint16_t", "v_rows": "uint16_t", "k_mean": "float", "v_mean": "float",
    "k_out": "uint16_t", "v_out": "uint16_t", "q_rows": "uint16_t", "q_kept": "float",
    "out_rows": "uint16_t",
}


def dequantize_kernel(dim: int, split: bool = False, tile: bool = False) -> str:
    """The dequantize kernel a prefill launches at this head dim (turboquant.metal's default
    rows form where it applies, else the group form): ``tile``, a float16 prefill's tile
    kernel (the rows form's only)."""
    lanes = dim // 32
    rows = dim % 32 == 0 and lanes in (1, 2, 4, 8, 16) and (not split or lanes >= 2)
    form = ("_tile" if tile else "_rows") if rows else ""
    return ("split_" if split else "") + "dequantize" + form + "_heads"
