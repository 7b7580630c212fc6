module gocp.local/bench/floor

go 1.24
