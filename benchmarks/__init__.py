"""Side-by-side measurements of remat against the baselines (see DESIGN.md, "Measuring")."""
