"""The IKEv2 engine (RFC 7296), sans-I/O. Codec and crypto API (state machine: sa.py et al.):

- `const`: IntEnums (ExchangeType, PayloadType, NotifyType, TransformType, EncrId, PrfId,
  IntegId, DhId, IdType, AuthMethod, HashAlgorithm, TsType, ProtocolId, CfgType...);
  parsed values stay ints, `name_of(Enum, v)` prints either.
- `errors`: IkeError > IkeProtocolError(notify_type, detail, data) > IkeIntegrityError (bad
  ICV: drop). Parsers raise nothing else on malformed input.
- `payloads`: frozen dataclasses SecurityAssociation(Proposal(Transform)), KeyExchange, Nonce,
  IdInitiator/IdResponder (to_bytes() = IDx' for AUTH), Certificate, CertificateRequest,
  Authentication, Notify, Delete, VendorId, TsInitiator/TsResponder (model.TrafficSelector),
  Configuration, EncryptedPayload, UnknownPayload; `PAYLOAD_CLASSES` registry; each has
  `parse(body)` / `to_bytes()` (body without the generic header).
- `message`: `Message.parse(data)`, `msg.decrypted(cipher, sk_e, sk_a)`, `msg.to_bytes()`,
  `msg.encrypt(cipher, sk_e, sk_a, rng)`, `msg.get(Cls)/all(Cls)/notify(type)`;
  `peek_header(data)`; `classify_udp4500(datagram)`, `add_non_esp_marker(msg)`.
- `crypto`: `key_exchange(group, rng)` -> `.public`, `.shared(peer)`; `prf_for(id)` -> Prf
  (`prf(key, data)`, `prf.plus(key, seed, n)`); `IkeCipher.from_ids(encr, key_bits, integ)`;
  `skeyseed`, `skeyseed_rekey`, `derive_ike_keys` -> IkeKeys(.outbound/.inbound(initiator));
  `child_keys` (KEYMAT, optional PFS g^ir); descriptor tables ENCRS/INTEGS/PRFS (ESP names as
  in model.EspAlgorithm, Wireshark names for the key log).
- `keylog`: Wireshark `ikev2_decryption_table` / `esp_sa` lines. `KeyLogWriter(path)`
  (file 0600) `.log_ike_sa(spi_i, spi_r, cipher, keys)`, `.log_child_sa(ChildSaParams)`;
  `read_keylog(file or strongSwan save-keys dir)` -> KeyTable(.ike[(spi_i, spi_r)], .esp_for()).
- `decrypt`: the `oe-agent decrypt PCAP --keylog FILE` verb (`open_esp`, `describe`);
  `pcap`: pcap/pcapng reader (`read_frames`, `ip_of`).

Randomness: every function that needs it takes `rng(n) -> bytes` (nonces, SPIs, IVs, DH
private values); nothing here reads a clock, a socket or a global RNG.
"""
