"""The shared core: everything both shells (``flexisync`` and ``flexisync.aio``) use.

Validation, key layout, codecs, Lua scripts and state machines live here once, written
as *plans* (:mod:`flexisync._core.plan`): generators that yield the Redis work they need
and receive its replies. The sync shell runs a plan with blocking I/O, the async shell
with ``await``; neither holds any logic of its own.
"""
