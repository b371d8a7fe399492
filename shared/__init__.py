"""The library every Xietong service shares: settings, codec, Kafka helpers, dead letters,
logging, health and metrics. Services import this package and ``schemas``, never each other."""
