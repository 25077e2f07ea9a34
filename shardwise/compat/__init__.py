"""Configs of other frameworks, read as shardwise configs."""
