"""The central side of gallery sync: `facenet-agent server ...`.

- store.py keeps identities, published versions and sightings, in SQLite or PostgreSQL;
- publisher.py turns store changes into signed versions and publishes them;
- collector.py writes the devices' identity events into the sightings store;
- client.py is the MQTT 5 client that both use.
"""
