"""What a client may send: the name it sends as, and the listeners it may call.

Clients are the only senders from outside. A listener's name, ``system`` and
``system.*`` belong to the organism: a client that could send as ``shouter``
would pass ``shouter``'s peer checks, and one sending as ``system.buffer.<id>``
could inject answers into a run it never started. So every door (HTTP,
``run --stdin``) tells the pump who is asking with a :class:`ClientAccess`,
and the pump refuses what that client may not send before anything is queued.

Which listeners a client may call is two walls, one inside the other: the
organism opens a listener to clients with ``ingress: true`` (closed by
default, so a listener meant to be internal stays internal unless someone
says otherwise), and a client with a token may call only the listeners its
token grants among those.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from xml_pipeline.organism import Listener, is_reserved


@dataclass(frozen=True, slots=True)
class ClientAccess:
    identity: str | None = None
    """The authenticated client's name, which its messages must carry as ``from``.
    None: not authenticated, so any client name will do (never a listener's)."""
    granted: frozenset[str] | None = None
    """The listeners this client's token grants; None: no token, no further limit."""
    ingress_applies: bool = True
    """False only for in-process callers (tests, embedding programs), which may call any listener."""

    @classmethod
    def anonymous(cls) -> ClientAccess:
        """A client the door did not authenticate: it may call the listeners open to clients."""
        return cls()

    @classmethod
    def authenticated(cls, identity: str, granted: frozenset[str]) -> ClientAccess:
        return cls(identity=identity, granted=granted)

    @classmethod
    def in_process(cls) -> ClientAccess:
        """Code in the daemon's own process (``xml_pipeline.testing``): any listener, but still only as a client."""
        return cls(ingress_applies=False)

    def sender_refusal(self, sender: str, listeners: Mapping[str, Listener]) -> str | None:
        """Why this client may not send as ``sender``, or None when it may."""
        if is_reserved(sender):
            return f"{sender!r} is reserved for the organism itself; clients send under a name of their own"
        if sender in listeners:
            return f"{sender!r} is a listener; clients may not send as one"
        if self.identity is not None and sender != self.identity:
            return f"this client is authenticated as {self.identity!r}, so <from> must be {self.identity!r}"
        return None

    def target_refusal(self, target: Listener) -> str | None:
        """Why this client may not call ``target``, or None when it may."""
        if self.ingress_applies and not target.ingress:
            return f"{target.name!r} is not open to clients (its organism.yaml entry says no 'ingress: true')"
        if self.granted is not None and target.name not in self.granted:
            return f"client {self.identity!r} is not granted {target.name!r}"
        return None


IN_PROCESS = ClientAccess.in_process()
"""What the engines assume of a caller that names no access: code in this process."""
