"""The cabinet agent (insertcoin agent --config cabinet.toml). Imports no server library."""
