"""The Firecracker backend: API client (api), process lifecycle and snapshots (process), jailer (jailer),
binary lookup (binaries), and the factory that builds a FirecrackerVmm from the config (backend)."""
