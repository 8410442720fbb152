"""Validates a FHIR Bundle (JSON file, argv[1]) with the independent fhir.resources package
(R4B models) and prints how many resources of each type it holds, as JSON. Exits non-zero
with the validator's message when the Bundle is not valid. Used by the FHIR export tests."""
import json
import sys

from fhir.resources.R4B.bundle import Bundle

text = open(sys.argv[1]).read()
b = Bundle.parse_raw(text) if hasattr(Bundle, "parse_raw") else Bundle.model_validate_json(text)
counts = {}
for e in b.entry:
    t = e.resource.resource_type
    counts[t] = counts.get(t, 0) + 1
print(json.dumps(counts))
