"""keruta-agent: runs one keruta task inside its container and reports to the keruta API."""
