"""Thread assignment: every thread of the pump's live conversations, by call chain.

A conversation's threads form a tree of call chains (``client``,
``client/greeter``, ``client/greeter/shouter``...). The pump that owns a
conversation is the only one that adds to it, so routing reads the chains
here, never the shared store; each new thread is also written to the shared
registry (the :class:`RegisterThread` writes returned here, which the caller
batches with the hop) so that handlers can read it.
"""

from __future__ import annotations

from collections.abc import Iterable

from xml_pipeline.memory.state_ops import RegisterThread
from xml_pipeline.message_bus.conversations import Conversation
from xml_pipeline.message_bus.thread_registry import Pruned, chain_key, new_thread_id


class CallChains:
    def __init__(self) -> None:
        self._threads: dict[str, tuple[Conversation, tuple[str, ...]]] = {}

    def __len__(self) -> int:
        return len(self._threads)

    def continued_by(self, thread: str, sender: str, identity: str | None) -> Conversation | None:
        """The live conversation whose ``thread`` is ``sender``'s own, with a client still listening; else None.

        The same name is not the same client: a client with a token
        (``identity``) continues only its own conversations, and one without
        (on the socket any name will do) only those opened without a token.
        Only this pump's conversations can be continued (their mailbox is
        here), so its own index is all it needs to look at.
        """
        known = self._threads.get(thread)
        if known is None:
            return None
        conversation, chain = known
        if chain[-1] != sender or conversation.submission is None or conversation.identity != identity:
            return None
        return conversation

    def open(self, conversation: Conversation, target: str) -> tuple[str, list[RegisterThread]]:
        """A new conversation's root thread, and the thread its target is called on."""
        _, root = self.claim(conversation, (conversation.initiator,), conversation.id)
        thread, first = self.claim(conversation, (conversation.initiator, target))
        return thread, root + first

    def claim(
        self, conversation: Conversation, chain: tuple[str, ...], thread: str | None = None
    ) -> tuple[str, list[RegisterThread]]:
        """The thread of ``chain`` in ``conversation``, and the registry write a new one needs."""
        existing = conversation.chains.get(chain)
        if existing is not None:
            return existing, []
        thread = thread or new_thread_id()
        conversation.chains[chain] = thread
        self._threads[thread] = (conversation, chain)
        return thread, [RegisterThread(chain_key(conversation.id, chain), thread)]

    def extend(self, thread: str, target: str) -> tuple[str, list[RegisterThread]]:
        """The thread on which the head of ``thread``'s chain calls ``target``."""
        conversation, chain = self._threads[thread]
        return self.claim(conversation, (*chain, target))

    def caller_of(self, thread: str) -> Pruned | None:
        """Where the head of ``thread``'s chain sends its response; None at the root."""
        known = self._threads.get(thread)
        if known is None or len(known[1]) < 2:
            return None
        conversation, chain = known
        parent = chain[:-1]
        return Pruned(target=parent[-1], thread_id=conversation.chains[parent])

    def unclaim(self, threads: Iterable[str]) -> None:
        """Forget threads whose registration failed, so that a retry registers them again."""
        for thread in threads:
            known = self._threads.pop(thread, None)
            if known is not None:
                known[0].chains.pop(known[1], None)

    def forget(self, conversation: Conversation) -> None:
        """The conversation ended: none of its threads is routed any more."""
        for thread in conversation.chains.values():
            self._threads.pop(thread, None)
