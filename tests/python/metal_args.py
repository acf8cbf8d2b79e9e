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
    "order": "uint32_t",
}
