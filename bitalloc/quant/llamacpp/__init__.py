"""llama.cpp's own tools: built from a pinned sdist (``tools``) and ggml's quantizers through ctypes (``ggml_lib``)."""
