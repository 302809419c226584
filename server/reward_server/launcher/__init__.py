"""The `reward-server` launcher: lays out Triton's python backend, runs tritonserver under a
supervisor, and fronts its HTTP endpoint (serve.py)."""
