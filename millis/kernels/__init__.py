"""Int8 for CPU decode: the quantized Linear (quant) and millis's own AVX2 kernel (cpu_int8, qgemm.c)."""
