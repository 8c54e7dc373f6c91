"""How captures travel: the field table, the numpy-only codec, and safetensors files.

`fields` and `codec` import numpy alone, so an HTTP client decodes captures without MLX
or the engine; `files` writes and reads whole captures with MLX.
"""
