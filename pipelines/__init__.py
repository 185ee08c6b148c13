"""Jobs: tile, extract, train, heatmap, export, demo, cluster, CLI."""
