"""CPU benchmarks (`make bench`): each module here exposes run(), which prints ratios measured side by side."""
