"""From per-cell result files to the paper's tables: result types, collect, tables, plots, summary runs."""
