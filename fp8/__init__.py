"""FP8 training (report sec 3.3): formats, reference GEMM, kernels, module swap."""
