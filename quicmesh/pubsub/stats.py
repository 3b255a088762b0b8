"""Pub/sub counters: node-wide ones, and per subject for the busiest subjects (bounded memory)."""

from __future__ import annotations

from dataclasses import dataclass

PUBLISHED, DELIVERED, RECEIVED = range(3)
_SUBJECTS_COUNTED = 1000  # subjects with their own counters; the rest count under "(other)"
_SUBJECTS_SHOWN = 20


@dataclass
class Counters:
    published: int = 0  # publish() calls on this node
    delivered: int = 0  # messages handed to this node's subscriptions
    sent: int = 0  # datagrams and messages sent to peers
    received: int = 0  # datagrams and messages from peers
    dropped_full: int = 0  # datagrams a full subscription could not take
    dropped_send: int = 0  # datagrams a peer's queue did not take (or the peer was gone)
    no_subscriber: int = 0  # arrived from a peer, but no subscription here matches any more
    refused_publish: int = 0  # a peer's publish or request on a subject it may not publish to here
    refused_interest: int = 0  # interest entries refused: not allowed, or not valid
    refused_interest_limit: int = 0  # interest entries over pubsub.max_interest_per_peer
    interest_frames_refused: int = 0  # Interest frames over pubsub.interest_rate
    rerouted: int = 0  # queue-group messages given to another member after the first was lost or refused
    requests_sent: int = 0
    requests_served: int = 0
    no_responders: int = 0  # requests that found no subscriber (here, or anywhere for our own)


class SubjectCounts:
    """Published / delivered / received per subject, for at most _SUBJECTS_COUNTED subjects."""

    def __init__(self) -> None:
        self._counts: dict[str, list[int]] = {}

    def count(self, subject: str, which: int) -> None:
        counts = self._counts.get(subject)
        if counts is None:
            if len(self._counts) >= _SUBJECTS_COUNTED:
                subject = "(other)"
            counts = self._counts.setdefault(subject, [0, 0, 0])
        counts[which] += 1

    def top(self) -> list[dict[str, object]]:
        """The busiest subjects first, JSON-ready."""
        busiest = sorted(self._counts.items(), key=lambda item: -sum(item[1]))[:_SUBJECTS_SHOWN]
        return [{"subject": subject, "published": counts[PUBLISHED], "delivered": counts[DELIVERED],
                 "received": counts[RECEIVED]} for subject, counts in busiest]
