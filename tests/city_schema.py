"""The city schema and the cities the structured-output tests ask about (server and GPU tests alike; here so that
the GPU test needs no tritonclient)."""

CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 100000},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 40}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "country", "population_millions", "landmarks"],
    "additionalProperties": False,
}
CITIES = ["Paris", "London", "Tokyo", "Rome", "Madrid", "Berlin", "Cairo", "Lima", "Sydney", "Toronto",
          "Mumbai", "Beijing", "Moscow", "Nairobi", "Oslo", "Dublin", "Lisbon", "Vienna", "Athens", "Seoul"]
