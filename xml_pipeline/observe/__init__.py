"""Seeing what an organism does: conversation traces, a live tail, OpenTelemetry spans and the web view.

Both engines (the in-process pump and the durable engine) report to one
:class:`~xml_pipeline.observe.events.Observation`; everything here is a sink
attached to it. With no sink attached, each report returns at once.
"""
