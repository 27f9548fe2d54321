"""Non-linear RNN cells for the DEER solver. ``naive.py`` holds the GRU cell and the sequential references."""
