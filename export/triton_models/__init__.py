"""Model files of the Triton repository (export/triton_repo.py copies them as `model.py`).

They run inside Triton's Python backend, which provides `triton_python_backend_utils`;
nothing in this project imports them.
"""
