"""The stages put together: convert, measure sensitivities, plan to a budget and convert, sweep, inspect."""
