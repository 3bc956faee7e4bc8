// Go line echo: bufio reader and writer, flushing only when nothing more is
// buffered to read (Go's own gathered writes). Run with GOMAXPROCS=1.
package main

import (
	"bufio"
	"net"
	"os"
)

func serve(c net.Conn) {
	defer c.Close()
	r := bufio.NewReaderSize(c, 65536)
	w := bufio.NewWriterSize(c, 65536)
	for {
		line, err := r.ReadSlice('\n')
		if err != nil {
			return
		}
		w.Write(line)
		if r.Buffered() == 0 {
			if w.Flush() != nil {
				return
			}
		}
	}
}

func main() {
	ln, err := net.Listen("tcp", "127.0.0.1:"+os.Args[1])
	if err != nil {
		panic(err)
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			continue
		}
		go serve(c)
	}
}
