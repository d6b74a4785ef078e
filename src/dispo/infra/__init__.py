"""The infrastructure every layer above uses: running commands (proc), spawning and recording host processes
(processes), the session journal and its undo registry (journal, undo, txn), and progress reports (progress).
Nothing here imports from storage, net, vmm, runtime, web, daemon or cli."""
