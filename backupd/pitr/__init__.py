"""Continuous backup and point-in-time restore ([pitr]).

`link` keeps a replication link open and writes the master's command stream as `segments`;
`store` keeps closed segments locally and in S3; `windows` says which moments a chain of
segments can restore; `rebuild` turns a base backup and its segments into the data at a moment.
"""
