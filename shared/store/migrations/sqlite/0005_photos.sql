-- Home Pocket photos (rest.md "Photos and blobs"). The server keeps where the client-encrypted
-- bytes are and how big they are, nothing about what they show. Times are unix milliseconds.
--
-- A photo is 'pending' from the moment its upload starts (the row claims its transaction) until
-- its bytes are in the blob store and checked: a streamed upload makes it 'ready' itself, a direct
-- upload when POST /photos/{id}/complete has checked the object. Only 'ready' photos are visible.
CREATE TABLE photos (
    id TEXT PRIMARY KEY,
    -- No ON DELETE CASCADE: dropping a book's rows would strand its objects in the blob store,
    -- so whatever deletes a book must delete its photos (rows and objects) first.
    book_id TEXT NOT NULL REFERENCES books (id),
    device_id TEXT NOT NULL,                 -- the uploader (kept if that device goes)
    transaction_hash TEXT NOT NULL,          -- SHA-256 hex of the client's transaction_id
    blob_key TEXT NOT NULL UNIQUE,           -- server-made: photos/<hashed book id>/<random>.enc
    size_bytes BIGINT NOT NULL,              -- declared while pending, stored once ready
    mime_type TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'ready')),
    created_at BIGINT NOT NULL,
    completed_at BIGINT
);
-- One photo per (book, transaction): an upload repeated after a lost answer finds the first.
CREATE UNIQUE INDEX photos_book_transaction_idx ON photos (book_id, transaction_hash);
