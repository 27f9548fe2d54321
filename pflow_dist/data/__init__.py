"""Data sets available offline (no downloads at run time): synthetic MQAR associative recall, byte-level text from
files that ship with Python, long-sequence memory tasks, and omics-like tabular data. Import the module you need."""
