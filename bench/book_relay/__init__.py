"""Book relay mix benchmark (bench/book_relay.py): server, setup, device load processes."""
