"""Several daemons, one organism: durable, at-least-once delivery on Redis Streams.

With ``backend: {type: redis, delivery: at-least-once}`` every hop is an entry
in its target listener's stream before anyone acts on it, daemons sharing a
prefix consume those streams as one consumer group, and a hop is acknowledged
in the same Lua script that stores everything it produced. A daemon that dies
leaves its entries pending; a live one claims them and runs them again.

- :mod:`.hop`: a hop as a stream entry.
- :mod:`.store`: the keys and the two scripts (accept, commit) that are the
  only writers, and the reads around them.
- :mod:`.routing`: what a handler's result turns into (hops, replies, history,
  errors), computed without touching Redis.
- :mod:`.engine`: the consumers, the reclaimer, the heartbeat, and the doors
  the daemon's HTTP interface calls.
"""
