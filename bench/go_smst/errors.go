package main

import "errors"

var (
	ErrDuplicateNonce      = errors.New("duplicate nonce")
	ErrLeafIndexOutOfRange = errors.New("leaf index out of range")
	ErrNonceNotFound       = errors.New("nonce not found")
)
