"""Decisions, apart from the data: the controller (owns the workers; failures -> routing tables,
request moves, replacements), its recovery plans and placement policy, failure detection, fault
injection. Imports workers/ and below."""
