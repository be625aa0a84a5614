"""KV pages and their snapshots: the page allocator, the device page buffers, the checkpoint store.
Imports model/ and below."""
