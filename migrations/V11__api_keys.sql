-- API keys for the HTTP API (docs/security.md). Every `/v1` request carries
-- `Authorization: Bearer hf_live_<id>_<secret>`; the process looks the key up
-- by its public `id` and compares the SHA-256 of the whole key with
-- `key_hash` in constant time. The secret itself is never stored: it is
-- shown once, when the key is created.
--
-- A key has one scope:
--   reader    reads batches, reservations and accounts
--   producer  what a reader may, and previews, reservations, batches, cancels
--   admin     everything, on every account: grants, allowances, keys
-- A reader or producer key is limited to a list of accounts, or to all
-- (`accounts` NULL); an admin key always covers every account.
--
-- Revocation is final (a trigger refuses to clear `revoked_at`). Keys are
-- never deleted, so `holdfast key list` keeps the history.
--
-- Least privilege: every service group checks keys (every process serves the
-- HTTP API) and records when a key was last used, but only holdfast_admin
-- creates and revokes them.

CREATE TABLE api_keys (
    id            text PRIMARY KEY CHECK (id ~ '^[a-z2-7]{12}$'),
    key_hash      bytea NOT NULL CHECK (length(key_hash) = 32),
    scope         text NOT NULL CHECK (scope IN ('reader', 'producer', 'admin')),
    accounts      text[],
    name          text CHECK (length(name) <= 200),
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz,
    last_used_at  timestamptz,
    revoked_at    timestamptz,
    CONSTRAINT api_keys_admin_every_account CHECK (scope <> 'admin' OR accounts IS NULL),
    CONSTRAINT api_keys_accounts_listed CHECK (
        accounts IS NULL
        OR (cardinality(accounts) BETWEEN 1 AND 1000 AND array_position(accounts, NULL) IS NULL)
    ),
    CONSTRAINT api_keys_expire_after_creation CHECK (expires_at IS NULL OR expires_at > created_at)
);
COMMENT ON TABLE api_keys IS 'Bearer keys of the HTTP API; the secret is stored only as its SHA-256 (see V9__api_keys.sql).';
COMMENT ON COLUMN api_keys.id IS 'Public part of the key (hf_live_<id>_...): 12 characters of base32, random; how a request finds its key.';
COMMENT ON COLUMN api_keys.key_hash IS 'SHA-256 of the whole key as sent (hf_live_<id>_<secret>); compared in constant time.';
COMMENT ON COLUMN api_keys.scope IS 'reader, producer or admin (each may do what the one before may).';
COMMENT ON COLUMN api_keys.accounts IS 'The accounts a reader or producer key may use; NULL: every account (always NULL for admin keys).';
COMMENT ON COLUMN api_keys.name IS 'What the key is for, as its creator wrote it.';
COMMENT ON COLUMN api_keys.expires_at IS 'The key is refused from this time on; NULL: never expires.';
COMMENT ON COLUMN api_keys.last_used_at IS 'Coarse: written at most once a minute per key and process.';
COMMENT ON COLUMN api_keys.revoked_at IS 'When the key was revoked; it is refused from then on. Final.';

CREATE FUNCTION api_keys_revocation_is_final() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.revoked_at IS NOT NULL AND NEW.revoked_at IS DISTINCT FROM OLD.revoked_at THEN
        RAISE EXCEPTION 'API key % was revoked at %; a revocation is final', OLD.id, OLD.revoked_at
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER api_keys_revocation_is_final BEFORE UPDATE OF revoked_at ON api_keys
    FOR EACH ROW EXECUTE FUNCTION api_keys_revocation_is_final();
COMMENT ON FUNCTION api_keys_revocation_is_final() IS
    'Refuses to clear or move the revocation time of a revoked key.';

-- Privileges (see V3__roles.sql). The service groups read what checking a
-- key needs (not its name or creation time) and may only bump last_used_at;
-- holdfast_admin creates, lists and revokes.
GRANT SELECT (id, key_hash, scope, accounts, expires_at, last_used_at, revoked_at),
      UPDATE (last_used_at)
    ON api_keys TO holdfast_coordinator, holdfast_worker, holdfast_reconciler;
GRANT SELECT,
      INSERT (id, key_hash, scope, accounts, name, expires_at),
      UPDATE (last_used_at, revoked_at)
    ON api_keys TO holdfast_admin;
