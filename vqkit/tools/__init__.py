"""Teaching tools: vector pager, sampling, VQ visualisation and export."""
