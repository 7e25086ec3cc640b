package main

// Side-by-side harness (not part of the repo): reads nonces int32 [n] and vectors [n, 24] written
// by bench/bench_merkle.py, builds the network's SMST (leaf hash + Insert per leaf, then GetRoot),
// prints the root and the wall time of each round.
import (
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"os"
	"sort"
	"strconv"
	"time"
)

func main() {
	blob, err := os.ReadFile(os.Args[1])
	if err != nil {
		panic(err)
	}
	rounds, _ := strconv.Atoi(os.Args[2])
	n := len(blob) / 28
	nonces := make([]int32, n)
	for i := 0; i < n; i++ {
		nonces[i] = int32(binary.LittleEndian.Uint32(blob[4*i:]))
	}
	vectors := blob[4*n:]
	var times []float64
	for r := 0; r < rounds; r++ {
		t0 := time.Now()
		tree := NewSMST(24)
		for i := 0; i < n; i++ {
			leaf := make([]byte, 0, 28)
			leaf = binary.LittleEndian.AppendUint32(leaf, uint32(nonces[i]))
			leaf = append(leaf, vectors[24*i:24*i+24]...)
			if _, err := tree.Insert(nonces[i], smstHashLeaf(leaf)); err != nil {
				panic(err)
			}
		}
		root, count := tree.GetRoot()
		dt := time.Since(t0).Seconds()
		times = append(times, dt)
		fmt.Printf("round %d: %.3f s root %s count %d\n", r, dt, hex.EncodeToString(root), count)
	}
	sort.Float64s(times)
	fmt.Printf("median %.3f s\n", times[len(times)/2])
}
