"""``python -m services.analytics``: run the analytics service (see :mod:`.app`)."""

from services.analytics.app import main

if __name__ == "__main__":
    main()
