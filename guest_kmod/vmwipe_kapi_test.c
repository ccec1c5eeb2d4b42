// SPDX-License-Identifier: GPL-2.0-only
/*
 * Test client of vmwipe's in-kernel API (built only with
 * CONFIG_VMWIPE_KAPI_TEST=m): at load it takes an order-0 and an order-2
 * allocation, checks they are zeroed, fills them with 0x5a and logs their
 * PFNs; at unload it gives them back.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/mm.h>
#include <linux/module.h>
#include <linux/string.h>

#include "vmwipe.h"

static const unsigned int orders[] = { 0, 2 };
static struct page *pages[ARRAY_SIZE(orders)];

static void vmwipe_kapi_test_free(unsigned int n)
{
	while (n--)
		vmwipe_free_pages(pages[n], orders[n]);
}

static int __init vmwipe_kapi_test_init(void)
{
	unsigned int i;

	for (i = 0; i < ARRAY_SIZE(orders); i++) {
		size_t len = PAGE_SIZE << orders[i];

		pages[i] = vmwipe_alloc_pages(orders[i]);
		if (!pages[i]) {
			vmwipe_kapi_test_free(i);
			return -ENOMEM;
		}
		if (memchr_inv(page_address(pages[i]), 0, len)) {
			pr_err("order %u allocation is not zeroed\n", orders[i]);
			vmwipe_kapi_test_free(i + 1);
			return -EIO;
		}
		memset(page_address(pages[i]), 0x5a, len);
		pr_info("order %u pfn %#lx\n", orders[i], page_to_pfn(pages[i]));
	}
	return 0;
}
module_init(vmwipe_kapi_test_init);

static void __exit vmwipe_kapi_test_exit(void)
{
	vmwipe_kapi_test_free(ARRAY_SIZE(orders));
}
module_exit(vmwipe_kapi_test_exit);

MODULE_DESCRIPTION("Test client of the vmwipe in-kernel API");
MODULE_LICENSE("GPL");
