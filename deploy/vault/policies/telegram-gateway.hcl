# Vault/OpenBao policy for telegram-gateway: read its own KV v2 secret (engram/telegram) and nothing else.
# Token self-lookup and renewal come from Vault's "default" policy, which stays attached.

# The secret's current (or a given) version: data plus version metadata.
path "secret/data/engram/telegram" {
  capabilities = ["read"]
}

# Version list and custom_metadata (for example the key's "created" date).
path "secret/metadata/engram/telegram" {
  capabilities = ["read"]
}
