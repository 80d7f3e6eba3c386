"""Research variants of millis's CUDA encoder that measured no better than what it ships: kept so
bench/gpu_encoders.py and bench/gpu_gemm_sweep.py can measure them again (tests/test_gpu_research.py)."""
