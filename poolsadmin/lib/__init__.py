"""App-agnostic helpers: nothing here imports a poolsadmin app."""
