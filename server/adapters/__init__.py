"""Adapters as stored and managed: the file format and its checks, stores, the registry of resident
adapters, imports (pyreft, Hub), and the bridge that makes a file an applicable `server.reft` Adapter.

Depends on server.reft, never the reverse: api -> adapters -> reft; training -> adapters, reft.
"""
