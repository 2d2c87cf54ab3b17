// Command ztunnel-redirect-cni: placeholder until the real Go CNI plugin is merged here; it lets
// the image's Go builder stage build and ship a static binary at the path the real one will have.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "ztunnel-redirect-cni: placeholder build, not the CNI plugin")
	os.Exit(1)
}
