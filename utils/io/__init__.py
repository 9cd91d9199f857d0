"""Reading and writing files safely: atomic writes and checked JSON (files), safetensors
with checksums (tensor_io), the restricted unpickler for foreign formats (safe_pickle), and
checked downloads (download)."""
